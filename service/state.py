"""The service's state: settings, metrics, engine, batcher and the lifecycle loading → warming up →
ready → draining (or failed). The engine is loaded and warmed up in the background, in the engine
thread, so ``/healthz`` answers at once and ``/readyz`` turns 200 only when a warm-up batch has run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

from lowdiff.engines import STAGE_OVERLAP_ENGINES, EngineInfo
from lowdiff.errors import LowDiffError, SettingsError
from lowdiff.model import LowDiffModel, load_model
from lowdiff.requests import MAX_IMAGES_PER_REQUEST
from lowdiff.service.batcher import STAGE_API, Batcher, Engine
from lowdiff.service.metrics import ServiceMetrics
from lowdiff.service.settings import STAGE_OVERLAP_REFUSED, ServeSettings, parse_stage_limits
from lowdiff.service.staged import StagedBatcher, default_stage_limits

log = logging.getLogger("lowdiff.service")


def package_version() -> str:
    try:
        return metadata.version("lowdiff-serve")
    except metadata.PackageNotFoundError:
        return "unknown"


class Service:
    """Everything one app instance owns: settings, metrics, engine, batcher, lifecycle flags."""

    def __init__(self, settings: ServeSettings, model: LowDiffModel | None = None, engine: Engine | None = None):
        self.settings = settings
        self.model = model
        self.engine = engine
        self.metrics = ServiceMetrics()
        # One engine thread: loading, warm-up and every batch run there (some runtimes, CUDA graphs
        # and TensorRT contexts, are happiest on the thread that created them).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowdiff-engine")
        self.batcher: Batcher | None = None
        self.state = "loading"  # loading → warming up → ready → draining; or failed
        self.failure: str | None = None
        self.error: LowDiffError | None = None  # a load failure caused by what the user gave
        self.in_flight = 0
        self.engine_info: EngineInfo | None = None
        self.aborted = asyncio.Event()  # set at the end of grace: open requests answer 503
        self._load_task: asyncio.Task[None] | None = None

    # --- lifecycle
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def draining(self) -> bool:
        return self.state == "draining"

    def begin_drain(self) -> None:
        """SIGTERM: readiness and new requests turn 503; accepted requests still finish."""
        if self.state != "draining":
            log.info("draining: %d request(s) in flight", self.in_flight)
        self.state = "draining"
        self.metrics.ready.set(0)

    def idle(self) -> bool:
        return self.in_flight == 0

    def abort_in_flight(self) -> None:
        """End of grace (or a second SIGTERM): every request still open is answered 503 + Retry-After."""
        self.aborted.set()

    def engine_busy(self) -> bool:
        return self.batcher is not None and self.batcher.running

    async def start(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="lowdiff-load")

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.batcher is not None:
            await self.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(self.executor, self._load_engine)
            self.engine = engine
            self.engine_info = engine.info()
            info = self.info()
            self.metrics.info.info({k: str(info.get(k)) for k in ("model", "engine", "device", "precision", "version")})
            if self.state == "loading":
                self.state = "warming up"
            started = time.monotonic()
            await loop.run_in_executor(self.executor, engine.warmup, self.settings.warmup_batch)
            log.info(
                "engine ready",
                extra={
                    "warmup_s": round(time.monotonic() - started, 3),
                    **{k: self.info().get(k) for k in ("model", "engine", "device")},
                },
            )
            self.batcher = self._make_batcher(engine)
            self.batcher.start()
            if self.state == "warming up":
                self.state = "ready"
                self.metrics.ready.set(1)
        except LowDiffError as exc:  # what the user gave: one line, and `lowdiff serve` exits with status 2
            self.error = exc
            self.failure = exc.one_line()
            self.state = "failed"
            log.error("engine failed to load: %s", self.failure)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.exception("engine failed to load or warm up")

    def _make_batcher(self, engine: Engine) -> Batcher:
        """The scheduler ``--scheduler`` names; staged limits are checked against the model's stages here
        (a resolution the model lacks is a SettingsError: `lowdiff serve` exits 2 naming the flag)."""
        s = self.settings
        assert self.engine_info is not None
        resolutions = self.engine_info.resolutions
        if s.scheduler == "cascade":
            staged_only = {"--max-batch-per-stage": s.max_batch_per_stage, "--overlap-backlog": s.overlap_backlog}
            for flag, value in staged_only.items():
                if value is not None:
                    log.warning("%s is ignored: it applies to --scheduler staged only", flag)
            delay = s.max_delay_ms / 1000
            return Batcher(engine, self.executor, self.metrics, s.max_batch, delay, s.max_queue, resolutions)
        limits = self._stage_limits(resolutions)
        if not all(hasattr(engine, name) for name in STAGE_API):
            raise SettingsError("--scheduler: this engine cannot run one stage at a time; use cascade", "scheduler")
        overlap = self._stage_overlap()
        if not overlap and s.overlap_backlog is not None:
            log.warning("--overlap-backlog is ignored: it applies with --stage-overlap on (or auto, on a GPU)")
        log.info(
            "staged scheduler",
            extra={
                "limits": {str(r): limits[r] for r in resolutions},
                "stage_overlap": overlap,
                "overlap_backlog": s.overlap_backlog,
            },
        )
        return StagedBatcher(
            engine,  # type: ignore[arg-type]  # checked above
            self.executor,
            self.metrics,
            resolutions,
            limits,
            s.max_delay_ms / 1000,
            s.max_queue,
            overlap=overlap,
            device=self.engine_info.device,
            overlap_backlog=s.overlap_backlog,
        )

    def _stage_limits(self, resolutions: Sequence[int]) -> dict[int, int]:
        """The staged scheduler's per-resolution call limits: the defaults, then ``--max-batch-per-stage``
        (a resolution the model lacks is a SettingsError naming the flag)."""
        s = self.settings
        limits = default_stage_limits(resolutions, s.max_batch)
        if s.max_batch_per_stage is not None:
            given = parse_stage_limits(s.max_batch_per_stage)
            unknown = sorted(set(given) - set(resolutions))
            if unknown:
                raise SettingsError(
                    f"--max-batch-per-stage: no stage at resolution {unknown[0]} "
                    f"(this model's stages: {', '.join(map(str, resolutions))})",
                    "max_batch_per_stage",
                )
            limits.update(given)
        return limits

    def _stage_overlap(self) -> bool:
        """``--stage-overlap`` against the loaded engine (its kind and device, which an engine passed in
        directly may give otherwise than the settings): 'on' where it cannot overlap is a SettingsError;
        'auto' is on for CUDA with an engine that supports it and more than one stage."""
        assert self.engine_info is not None
        setting, kind = self.settings.stage_overlap, self.engine_info.engine
        stages = len(self.engine_info.resolutions)
        if setting == "off":
            return False
        if setting == "auto":
            return self.engine_info.device.startswith("cuda") and kind in STAGE_OVERLAP_ENGINES and stages > 1
        if kind not in STAGE_OVERLAP_ENGINES:
            why = STAGE_OVERLAP_REFUSED.get(kind, "it does not declare that its stage calls may run concurrently")
            raise SettingsError(f"--stage-overlap: engine {kind!r} cannot overlap stages: {why}", "stage_overlap")
        if stages < 2:
            raise SettingsError("--stage-overlap: this model has one stage: nothing to overlap", "stage_overlap")
        return True

    def _load_engine(self) -> Engine:
        """Runs in the engine thread."""
        if self.engine is not None:
            return self.engine
        from lowdiff.engines import load_engine

        s = self.settings
        if self.model is None:
            self.model = load_model(s.checkpoint, s.config)
        # The most images the scheduler puts in one call of each stage sizes the cudagraph engine's buckets
        # (a staged 8×8 call of 512 is then one replay, not 8 of 64; a --max-batch above 64 is not split).
        resolutions = self.model.config.resolutions
        staged = s.scheduler == "staged"
        limits = self._stage_limits(resolutions) if staged else dict.fromkeys(resolutions, s.max_batch)
        return load_engine(
            self.model,
            s.engine,
            s.device,
            s.precision,
            engine_dir=s.engine_dir,
            threads=s.threads or None,
            stage_limits=limits,
        )

    def info(self) -> dict[str, Any]:
        """``/v1/models``: the engine's typed information plus what this server adds; {} before loading."""
        if self.engine_info is None:
            return {}
        info = self.engine_info.to_dict()
        config = getattr(self.model, "config", None)
        info["config"] = config.name if config is not None else info["model"]
        info["version"] = package_version()
        info["max_batch"] = self.settings.max_batch
        info["scheduler"] = self.settings.scheduler
        if isinstance(self.batcher, StagedBatcher):
            info["max_batch_per_stage"] = {str(r): n for r, n in zip(self.batcher.resolutions, self.batcher.limits)}
            info["stage_overlap"] = self.batcher.overlap
        info["max_images_per_request"] = min(MAX_IMAGES_PER_REQUEST, self.settings.max_queue)
        return info
