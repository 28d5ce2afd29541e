"""The shapes world, srae's embedded default: one coloured shape on a plain background.

``synth`` renders it and writes it in every input format (``srae data synth``), ``scorer`` reads an image back
(colour, shape, position, size) and judges it against a prompt, ``bench`` is the benchmark built on both
(``srae eval shapes``), and ``vocab`` makes the tiny LLM preset's tokenizer from the world's words. The world's
wordings (captions, requests, questions) live with every other wording in ``scale_rae_core.prompts``.

It sits above the engine (it runs inference and the scaling loop): nothing below the demo imports it.
"""
