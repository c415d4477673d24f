"""Where `avatarcast render` runs its jobs: in this process, in a pool of worker processes, or on Ray
actors. Every backend takes jobs and yields one result per job (in the order they finish), reporting
progress on the driver; a job's failure, down to its worker dying, becomes that job's result.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import queue
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from app.render_worker import RenderJob, RenderSettings

POLL_S = 0.1


def failure(audio: str, output: str | None, error: str) -> dict:
    """A failed result (index -1: no job of the batch; `failure_of` gives a job's)."""
    return {"index": -1, "input": audio, "output": output, "status": "failed", "duration_s": None, "frames": None,
            "wall_s": None, "rtf": None, "error": error}


def failure_of(job: RenderJob, error: str) -> dict:
    return {**failure(job.audio, job.output, error), "index": job.index, "avatar": job.avatar}


ProgressFn = Callable[[int, int, int], None]


class Backend(Protocol):
    name: str  # local | ray
    settings: RenderSettings

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]: ...

    def close(self) -> None: ...


class InProcessBackend:
    """One Renderer in this process, files one after another. The models load on the first file and stay
    loaded until `close()`, so one backend can serve several batches."""

    name = "local"

    def __init__(self, settings: RenderSettings, threads: int | None = None) -> None:
        self.settings, self.threads = settings, threads  # torch threads, process-wide (None: torch's default)
        self.renderer = None

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]:
        if self.renderer is None:
            from app.render_worker import Renderer

            self.renderer = Renderer(self.settings, threads=self.threads)
        for job in jobs:
            yield self.renderer.render(job, on_progress)

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None


_worker = None  # the Renderer of a pool process
_events = None  # its progress queue back to the driver


def _init_pool_worker(settings: RenderSettings, events, threads: int) -> None:
    global _worker, _events
    from app.render_worker import Renderer

    _worker, _events = Renderer(settings, threads=threads), events
    atexit.register(_close_pool_worker)


def _close_pool_worker() -> None:
    """Stop the engine and drop the models before the worker's interpreter shuts down."""
    global _worker
    if _worker is not None:
        _worker.close()
        _worker = None


def _pool_render(job: RenderJob) -> dict:
    return _worker.render(job, lambda *event: _events.put(event))


WORKER_DIED = ("its worker process died while rendering it (killed, out of memory, or a crash in native "
               "code); the other files were rendered in a fresh worker")


class ProcessPoolBackend:
    """N worker processes (spawned: no forked torch state), each loading the models once and sharing the
    CPU cores; progress comes back through a multiprocessing queue.

    A worker that dies breaks the whole pool (every unfinished future fails with BrokenProcessPool), so
    the unfinished files are rendered again in a fresh pool. The ones that were running when it broke
    (or that were unfinished in two broken pools) are suspects: each is rendered alone, one at a time,
    in a one-worker pool, where a death can only be its own; that file alone fails."""

    name = "local"

    def __init__(self, settings: RenderSettings, workers: int, threads: int | None = None) -> None:
        self.settings, self.workers, self.threads = settings, workers, threads

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]:
        ctx = multiprocessing.get_context("spawn")
        events = ctx.Queue()
        todo, suspects, breaks = list(jobs), set(), {j.index: 0 for j in jobs}
        while todo:
            alone = [j for j in todo if j.index in suspects]
            batch = alone or todo
            unfinished, running = yield from self._pool(ctx, events, batch, on_progress, one_at_a_time=bool(alone))
            done = {j.index for j in batch} - {j.index for j in unfinished}
            todo = [j for j in todo if j.index not in done]
            for job in unfinished:
                breaks[job.index] += 1
                if job.index in running or breaks[job.index] >= 2:
                    suspects.add(job.index)

    def _pool(self, ctx, events, jobs: list[RenderJob], on_progress: ProgressFn,
              one_at_a_time: bool) -> Generator[dict, None, tuple[list[RenderJob], set[int]]]:
        """Render `jobs` in one pool until it breaks: yields their results, returns (the jobs left
        unfinished by a broken pool, those of them that were running when it broke). One at a time, a
        job whose worker dies is failed here (it was alone: the death was its own)."""
        workers = 1 if one_at_a_time else min(self.workers, len(jobs))
        threads = self.threads or max(1, (os.cpu_count() or 1) // workers)  # the workers share the cores
        before = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker,
                                   initargs=(self.settings, events, threads))
        queue_ = list(jobs)
        futures: dict = {}
        running: set[int] = set()  # as seen at the last poll: a broken pool ends every future at once
        unfinished: list[RenderJob] = []
        clean = crashed = False
        try:
            while (queue_ or futures) and not unfinished and not crashed:
                while queue_ and not (one_at_a_time and futures):
                    job = queue_.pop(0)
                    futures[pool.submit(_pool_render, job)] = job
                finished, _ = wait(futures, timeout=POLL_S, return_when=FIRST_COMPLETED)
                _drain(events, on_progress)
                for fut in finished:
                    job = futures.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        if one_at_a_time:  # alone in its pool: the next suspect gets a fresh one
                            crashed = True
                            yield failure_of(job, WORKER_DIED)
                        else:
                            unfinished.append(job)
                        continue
                    except Exception as exc:  # the job could not be sent or returned (pickling)
                        result = failure_of(job, f"worker failed: {type(exc).__name__}: {exc}")
                    yield result
                if not unfinished:
                    running = {j.index for f, j in futures.items() if f.running()}
            for fut, job in futures.items():  # left when the pool broke: finished before it, or not
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    yield fut.result()
                else:
                    unfinished.append(job)
            unfinished += queue_
            clean = True
        finally:
            _drain(events, on_progress)
            if clean:
                pool.shutdown(wait=True)
            else:  # interrupted: do not wait for the files being rendered
                pool.shutdown(wait=False, cancel_futures=True)
                for process in set(multiprocessing.active_children()) - before:
                    process.terminate()
                    process.join(5)
        return unfinished, running & {j.index for j in unfinished}

    def close(self) -> None:
        pass  # the pools live only as long as one run


def _drain(events, on_progress: ProgressFn) -> None:
    while True:
        try:
            on_progress(*events.get_nowait())
        except queue.Empty:
            return


class RenderActor:
    """A Ray actor around a Renderer: models loaded once, files rendered one at a time."""

    def __init__(self, settings: RenderSettings, events, threads: int | None = None) -> None:
        from app.render_worker import Renderer

        self.renderer, self.events = Renderer(settings, threads=threads), events

    def render(self, job: RenderJob) -> dict:
        return self.renderer.render(job, lambda *event: self.events.put_nowait(event))


class RayBackend:
    """N Ray actors (one CPU each, plus one GPU where the cluster has GPUs); the driver hands each idle
    actor the next file and drains the actors' progress queue. Inputs and outputs must be on storage the
    workers share with the driver (one machine, or a shared filesystem)."""

    name = "ray"

    def __init__(self, settings: RenderSettings, workers: int, address: str | None = None,
                 threads: int | None = None) -> None:
        self.settings, self.workers, self.address, self.threads = settings, workers, address, threads

    def run(self, jobs: list[RenderJob], on_progress: ProgressFn) -> Iterator[dict]:
        try:
            import ray
            from ray.util.queue import Empty, Queue
        except ImportError:
            raise ValueError("--backend ray needs Ray: pip install 'avatarcast[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        events = Queue(actor_options={"num_cpus": 0})
        actor_cls = ray.remote(RenderActor).options(num_cpus=1, num_gpus=gpus)
        idle = [actor_cls.remote(self.settings, events, self.threads) for _ in range(min(self.workers, len(jobs)))]
        todo, running = list(jobs), {}
        try:
            while todo or running:
                while idle and todo:
                    actor, job = idle.pop(), todo.pop(0)
                    running[actor.render.remote(job)] = (actor, job)
                if not running:  # every actor died
                    for job in todo:
                        yield failure_of(job, "no Ray worker left to render it")
                    return
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                self._drain(events, Empty, on_progress)
                for ref in ready:
                    actor, job = running.pop(ref)
                    try:
                        result = ray.get(ref)
                        idle.append(actor)
                    except ray.exceptions.RayError as exc:  # the actor died; do not reuse it
                        result = failure_of(job, f"Ray worker failed: {type(exc).__name__}: {exc}")
                    yield result
            self._drain(events, Empty, on_progress)
        finally:
            for actor in idle + [a for a, _ in running.values()]:
                ray.kill(actor)
            events.shutdown(force=True)

    def close(self) -> None:
        pass  # actors live only as long as one run; the Ray connection stays for the caller

    @staticmethod
    def _drain(events, empty, on_progress: ProgressFn) -> None:
        try:
            batch = events.get_nowait_batch(events.qsize())
        except empty:
            return
        for event in batch:
            on_progress(*event)


def make_backend(name: str, settings: RenderSettings, jobs: int, address: str | None, threads: int | None = None):
    """threads: torch intra-op threads per worker (default: all cores in process, cores / jobs in a pool,
    Ray's OMP_NUM_THREADS = 1 in an actor). 1 avoids thread-pool stalls on an oversubscribed CPU."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if name == "ray":
        return RayBackend(settings, jobs, address, threads)
    if name != "local":
        raise ValueError(f"unknown backend {name!r}; use local or ray")
    if address:
        raise ValueError("--address is for --backend ray")
    return InProcessBackend(settings, threads) if jobs == 1 else ProcessPoolBackend(settings, jobs, threads)
