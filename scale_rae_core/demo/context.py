"""What one demo run knows: its options, its folder layout, the profile, the model it loads once; and what a
stage is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scale_rae_core.config import Profile
from scale_rae_core.errors import ConfigError
from scale_rae_core.events import Reporter
from scale_rae_core.flow.sampler import SAMPLERS
from scale_rae_core.infer.pipeline import SamplerSettings, Session
from scale_rae_core.scale.run import VERIFY_ON
from scale_rae_core.scale.select import SELF_VERIFICATION_METRICS
from scale_rae_core.shapes import bench


@dataclass(frozen=True)
class DemoOptions:
    """How much each stage does (the profile decides how long training runs)."""

    n_images: int = 1200  # images in the synthetic world (a tenth held out)
    gen_prompts: int = 6  # prompts for the generate stage (the first of the benchmark's fixed set)
    gen_per_prompt: int = 2  # images per prompt
    understand_images: int = 4  # held-out images asked the world's four questions
    scale_prompts: int = 3  # prompts for scale + verify
    scale_n: int = 2  # samples per round
    scale_rounds: int = 2  # rounds (n x rounds samples per prompt)
    bench_prompts: int | None = None  # benchmark prompts (None = the whole fixed set of 36)
    bench_k: int = 8  # benchmark samples per prompt (best-of-8 by self-verification vs single samples)
    bench_images: int = 24  # benchmark held-out images (4 questions each)
    sampler_steps: int = 25  # flow sampler steps per image (Euler)
    selector: str = bench.SELECTOR  # how scale and eval pick best-of-k: the prompt's caption loss given the sample ...
    verify_on: str = bench.VERIFY_ON  # ... read from the decoded picture re-encoded (the yes/no answer on the latent, the
    # reference's, ranks by noise on the tiny models: BENCHMARKS.md, "Why self-verification's gain is fragile")
    guidance: float = 3.0  # CFG weight for every sample the demo draws (3: colour+shape 66% → 84% on the shipped model)
    decoder_latent_cache: bool = True  # encode the images once (srae latent cache --for decoder); the decoder then
    # trains without the encoder's forward (2.1x the images per second on 2 cores; BENCHMARKS.md)
    finetune: bool = False  # run stage 2 on the stage-1 model (the bundled recipe); the model is its export
    # The class-conditional stage (the class DiT's training recipe is the profile's [dit_training]):
    class_samples: int = 8  # samples drawn per class (12 colour x shape classes)
    class_sampler: str = "heun"  # flow sampler of those samples (a SAMPLERS name, as srae sample --sampler); Heun
    # read 2.4 points more right than Euler at the same 25 steps (BENCHMARKS.md, the class stage)
    class_steps: int = 25  # its steps
    class_guidance: float = 4.0  # its CFG weight (1 = off; after a 3-minute run 4 reads ≈ 10 points more right than 1.5)
    class_latent_cache: bool = True  # encode the class folders once (srae latent cache), then train on the cache

    def __post_init__(self) -> None:
        for name in ("n_images", "gen_prompts", "gen_per_prompt", "understand_images", "scale_prompts", "scale_n",
                     "scale_rounds", "bench_k", "bench_images", "sampler_steps", "class_samples", "class_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo option {name} = {getattr(self, name)} must be at least 1")
        if self.guidance < 1.0:
            raise ConfigError(f"--guidance {self.guidance}: use 1 (off) or more")
        if self.class_guidance < 1.0:
            raise ConfigError(f"demo option class_guidance = {self.class_guidance}: use 1 (off) or more")
        if self.verify_on not in VERIFY_ON:
            raise ConfigError(f"demo option verify_on = {self.verify_on!r} is unknown; use {' or '.join(VERIFY_ON)}")
        if self.selector not in SELF_VERIFICATION_METRICS:
            raise ConfigError(f"demo option selector = {self.selector!r} is unknown; choose one of "
                              f"{', '.join(SELF_VERIFICATION_METRICS)}")
        if self.class_sampler not in SAMPLERS:
            raise ConfigError(f"demo option class_sampler = {self.class_sampler!r} is unknown; choose one of "
                              f"{', '.join(SAMPLERS)}")
        if self.n_images < 10:
            raise ConfigError(f"--n {self.n_images}: the demo needs at least 10 images (one in ten is held out)")


@dataclass
class Ctx:
    out: Path
    profile: Profile
    reporter: Reporter
    options: DemoOptions
    command: str = "srae demo"  # the command line that makes this run's model (recorded in model/ABOUT.json)
    _session: Session | None = None

    @property
    def world(self) -> Path:
        return self.out / "shapes"

    @property
    def packed(self) -> Path:
        return self.out / "packed"

    @property
    def stats(self) -> Path:
        return self.out / "stats.safetensors"

    @property
    def decoder_dir(self) -> Path:
        return self.out / "decoder" / "decoder"

    def export(self, stage: str) -> Path:
        return self.out / stage / "export"

    @property
    def model_export(self) -> Path:
        """The export the model is made of: stage 2's when the run finetunes, else stage 1's."""
        return self.export("stage2" if self.options.finetune else "stage1")

    @property
    def model(self) -> Path:
        """The trained model with its decoder in one folder (``srae generate --model runs/demo/model``)."""
        return self.out / "model"

    @property
    def dit_dir(self) -> Path:
        """The class-conditional stage's folder (``demo.class_dit``)."""
        return self.out / "dit"

    @property
    def seed(self) -> int:
        return self.profile.run.seed

    def child_reporter(self, run_dir: Path) -> Reporter:
        """A reporter for a trainer: its events in the trainer's run folder, progress as the demo's."""
        return Reporter(run_dir / self.profile.output.events_file, show_progress=self.reporter.show_progress)

    def stage1_profile(self) -> Profile:
        prof = self.profile.model_copy(deep=True)
        prof.model.stats = str(self.stats)
        heldout = self.world / "heldout" / "conversations.jsonl"
        if not prof.data.eval and heldout.is_file():  # held-out curves, incl. whether the head follows the prompt
            prof.data.eval = str(heldout)
        return prof

    def dit_profile(self) -> Profile:
        """The profile of the class DiT: its latent space is the demo's (the encoder, its decoder and statistics)."""
        prof = self.profile.model_copy(deep=True)
        prof.dit_training.stats = str(self.stats)
        prof.dit_training.decoder = str(self.decoder_dir)
        # the demo trains in one process: the whole step in one forward (the profile's micro-batch divides over ranks)
        prof.dit_training.micro_batch_size = prof.dit_training.global_batch_size
        return prof

    def session(self) -> Session:
        """The trained model and decoder, loaded once for every inference stage."""
        if self._session is None:
            self._session = Session.open(str(self.model), self.profile)  # the decoder is the folder's decoder/
        return self._session

    def sampler(self) -> SamplerSettings:
        return SamplerSettings(steps=self.options.sampler_steps, guidance=self.options.guidance)


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    run: Callable[[Ctx, bool], dict[str, Any]]  # (ctx, continue an interrupted run) -> info, with "summary"
    outputs: Callable[[Ctx], list[Path]]  # must all exist for the stage to be reused
    inputs: Callable[[Ctx], dict[str, Any]] = lambda ctx: {}
    workdir: Callable[[Ctx], Path | None] = lambda ctx: None  # deleted when the stage starts over
    always: bool = False  # never reused (cheap views of other stages' outputs)
    enabled: Callable[[Ctx], bool] = lambda ctx: True  # a disabled stage is left out (and out of its dependents' inputs)
