"""The Python API: a Scale-RAE model as an object, with no command line in between.

    from scale_rae_core import Pipeline

    pipe = Pipeline.from_pretrained()                   # the bundled shapes model; or a folder / hub repo id
    images = pipe.generate(["Generate an image of a red circle on the left."], n=2, steps=25, guidance=3.0)
    answer = pipe.understand(images[0], "What colour is the shape?")

:class:`Pipeline` wraps the inference :class:`~scale_rae_core.infer.pipeline.Session` the commands use: the same
model loading (srae exports of either version, released ``nyu-visionx/Scale-RAE-*`` models, the bundled model), the
same decoder choice (``decoder``, else the model folder's ``decoder/``, else the released one for its encoder), the
same sampler and seeds (image j of every prompt uses seed ``seed + j``), so ``generate`` returns exactly the images
``srae generate`` writes. Nothing here imports the CLI.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scale_rae_core.config import Profile, load_profile
from scale_rae_core.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from scale_rae_core.infer.pipeline import Session


class Pipeline:
    """A loaded model (+ its pixel decoder, loaded on first use) and the device it runs on; close it when done
    (or use it in a ``with`` block) to release the backend it opened."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, decoder: str | Path | None = None,
                        profile: str | Path | Profile = "tiny-cpu", *, dtype: str | None = None) -> Pipeline:
        """Load ``model``: an srae export or model folder, a released Scale-RAE folder, or a hub repo id
        (``owner/name[@revision]``); None is the bundled shapes demo model. ``decoder``: a pixel decoder folder or
        repo (srae, released RAE, or diffusers AutoencoderRAE); default as for ``--decoder``. ``profile``: a shipped
        profile name, a TOML path or a loaded :class:`~scale_rae_core.config.Profile` (device and precision)."""
        from scale_rae_core.infer.loading import bundled_model
        from scale_rae_core.infer.pipeline import Session

        if model is None:
            model = bundled_model()
            if model is None:
                raise ConfigError("Pipeline.from_pretrained: this install has no bundled model; pass a model folder or repo id")
        prof = profile if isinstance(profile, Profile) else load_profile(str(profile), [])
        session = Session.open(str(model), prof, dtype=dtype, decoder=None if decoder is None else str(decoder))
        return cls(session)

    def generate(self, prompts: str | Sequence[str], n: int = 1, seed: int = 0, steps: int = 50, guidance: float = 1.0,
                 *, sampler: str = "euler", batch_size: int = 4, max_new_tokens: int = 64) -> list[Image.Image]:
        """``n`` images per prompt, prompt by prompt (image j of a prompt uses seed ``seed + j``), as RGB images."""
        from PIL import Image

        from scale_rae_core.infer.generate import generate_images
        from scale_rae_core.infer.pipeline import SamplerSettings

        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError("Pipeline.generate: pass one or more non-empty prompt strings")
        settings = SamplerSettings(steps=steps, guidance=guidance, method=sampler)
        with tempfile.TemporaryDirectory() as tmp:  # the command's own writer: the same PNG bytes as srae generate
            result = generate_images(self.session, texts, Path(tmp), settings, seed=seed, n=n, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens)
            images = []
            for record in result.images:
                assert record.png is not None  # decode=True
                with Image.open(record.png) as im:
                    images.append(im.convert("RGB"))
        return images

    def understand(self, image: str | Path | Image.Image, question: str, *, max_new_tokens: int = 512) -> str:
        """The model's answer to ``question`` about ``image`` (a file path or a PIL image)."""
        from PIL import Image

        from scale_rae_core.data.images import open_image_file
        from scale_rae_core.infer.understand import answer_images

        picture = image if isinstance(image, Image.Image) else open_image_file(image)
        return answer_images(self.session, [picture], [question], max_new_tokens)[0]

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.__exit__(*exc)
