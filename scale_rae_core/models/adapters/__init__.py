"""External checkpoint layouts -> srae's modules: key maps and config translation, one module per family.

* :mod:`.scale_rae` — **released Scale-RAE** (``nyu-visionx/Scale-RAE-*``, a ``ScaleRAEQwenForCausalLM`` state
  dict + ``cambrian_qwen`` config.json) <-> :class:`~scale_rae_core.models.scale_rae.ScaleRAE`.
* :mod:`.rae_decoder` — **released RAE / Scale-RAE decoder** (``model.pt``, the reference ``GeneralDecoder``) <->
  :class:`~scale_rae_core.models.decoder.Decoder`.
* :mod:`.diffusers_rae` — **diffusers AutoencoderRAE** (``config.json`` + ``diffusion_pytorch_model.safetensors``)
  <-> :class:`~scale_rae_core.models.decoder.Decoder` + :class:`~scale_rae_core.models.stats.LatentStats`.
* :mod:`.imagereward` — **ImageReward** (``ImageReward.pt``: timm-style BLIP ViT + BLIP ``med.py`` BERT + reward
  MLP) -> :class:`~scale_rae_core.scale.imagereward.ImageReward`.
* :mod:`.class_dit` — **class-conditional DiTs**: RAE's released stage-2 checkpoints (``stage2_model.pt``: DiT^DH /
  LightningDiT, read weights-only, loaded strictly) and the model folders ``srae train dit`` writes (format
  ``srae-class-dit``), so both kinds load in one place.

The model files hold only the models; the loaders (``infer/loading.py``, ``models/convert.py``,
``scale/imagereward.py``, ``eval/samples.py``) read the files and load strictly through
:func:`scale_rae_core.models.io.load_state`.
"""
