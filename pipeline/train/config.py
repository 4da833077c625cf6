"""The training knobs shared by both training stages (each stage embeds a ``TrainConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError, no_fingerprint

PRECISIONS = ("fp32", "bf16")
# Above this, a per-sample rate (``lr_scale_by_batch``) is surely an absolute rate given by
# mistake: the reference's is 4.5e-6, and x a global batch of 8 it would already be 8e-3.
MAX_PER_SAMPLE_LR = 1e-3
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Steps, batch, optimizer, schedule, DeepSpeed and Ray Train resources.

    The global batch is ``micro_batch × grad_accum × num_workers``, fixed at a run's first step:
    a run resumed on another worker count keeps it, with ``grad_accum`` re-derived
    (:func:`pipeline.train.loop.resolve`). Worker count, logging and checkpoint cadence stay out
    of the fingerprint: changing them must not restart training. ``steps`` is out of it too, so
    raising it continues the same run from its newest checkpoint. ``data_streams`` (0: the least
    common multiple of 12 and the worker count) is how many partitions the training data is cut
    into (pipeline.data.loader); fixed at the first step too, a run can later resume on any
    worker count that divides it. With ``min_workers`` Ray Train runs elastically: on any count
    from ``min_workers`` to ``num_workers`` the cluster can host (after a node is lost it
    continues on fewer workers, and grows back when capacity returns).
    """

    steps: int = no_fingerprint(100)
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scale_by_batch: bool = False  # True: lr is per sample; the step's rate is lr x global batch
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # 0: off
    precision: str = "fp32"
    zero_stage: int = 0
    num_workers: int = no_fingerprint(2)
    min_workers: int = no_fingerprint(0)  # 0: exactly num_workers; else elastic (Ray Train)
    use_gpu: bool = no_fingerprint(False)
    cpus_per_worker: float = no_fingerprint(1.0)
    checkpoint_every: int = no_fingerprint(50)
    keep_checkpoints: int = no_fingerprint(2)
    max_failures: int = no_fingerprint(1)
    data_streams: int = no_fingerprint(0)
    log_every: int = no_fingerprint(10)
    image_every: int = no_fingerprint(100)  # reconstruction / sample grids

    def due(self, step: int, every: int) -> bool:
        """Whether periodic work with period ``every`` (logging, images, checkpoints) runs after
        ``step``: every ``every`` steps and always after the last one."""
        return step % every == 0 or step == self.steps

    def validate(self) -> None:
        positive = ("steps", "micro_batch", "grad_accum", "num_workers", "checkpoint_every",
                    "keep_checkpoints", "log_every", "image_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr is None:  # a stage's own default rule (TrainVQGANConfig)
            pass
        elif self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        elif self.lr_scale_by_batch and self.lr > MAX_PER_SAMPLE_LR:
            raise ConfigError(
                "lr", f"with lr_scale_by_batch: true, lr is the rate per sample of the global "
                f"batch (the reference's base_learning_rate, 4.5e-6), so {self.lr:g} x "
                f"{self.global_batch} samples would train at {self.base_lr:g}; give the "
                f"per-sample rate, or set lr_scale_by_batch: false to give the step's rate")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < 0:
            raise ConfigError("max_failures", f"must be >= 0, got {self.max_failures}")
        if self.data_streams < 0:
            raise ConfigError("data_streams", f"must be >= 0 (0: automatic), got "
                              f"{self.data_streams}")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError("min_workers", f"must be in [0, num_workers={self.num_workers}] "
                              f"(0: no elastic range), got {self.min_workers}")
        for count in self.worker_counts():
            if (self.grad_accum * self.num_workers) % count:
                raise ConfigError(
                    "min_workers" if count != self.num_workers else "num_workers",
                    f"the global batch (micro_batch x grad_accum={self.grad_accum} x "
                    f"num_workers={self.num_workers}) cannot be split over {count} workers; "
                    f"choose counts that divide grad_accum x num_workers")
            if self.data_streams and self.data_streams % count:
                raise ConfigError("data_streams", f"{self.data_streams} partitions cannot be "
                                  f"split evenly over {count} workers; use a multiple of it")

    def worker_counts(self) -> range:
        """The worker counts a Ray launch may run on: ``num_workers``, or the elastic range."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.num_workers

    @property
    def base_lr(self) -> float:
        """The optimizer's peak rate (before warmup and decay): ``lr``, or with
        ``lr_scale_by_batch`` the reference's rule ``lr × global batch`` (``lr`` per sample).

        On a resolved config (:func:`pipeline.train.loop.resolve`) ``global_batch`` is the run's
        own, kept on any worker count, so a resumed run keeps its rate.
        """
        return self.lr * self.global_batch if self.lr_scale_by_batch else self.lr

    def lr_rule(self) -> str:
        """How :attr:`base_lr` came about, for the log."""
        if self.lr_scale_by_batch:
            return f"lr {self.lr:g} per sample x global batch {self.global_batch}"
        return "lr as given"
