"""A Ray Tune trial on several Ray Train workers (``locoprop sweep --backend ray --workers-per-trial W``).

The trial's actor only drives a Ray Train ``TorchTrainer`` of W workers,
which reserve the trial's CPUs and GPUs in their own placement group; Ray
Train makes their process group (gloo on CPU, NCCL on GPU), in which every
worker runs the same ``train()`` data-parallel (SPEC §11: rank 0 writes the
run directory, every rank evaluates and resumes from rank 0's checkpoint).

Rank 0 sends each evaluation's metrics to the trial, which hands them to
Tune one per ``step``, and waits for Tune's answer: a further ``step`` lets
the workers go on, ``cleanup`` (ASHA stopped the trial) makes them end the
run as "stopped". So every run ends by itself and Ray Train removes its
placement group; a trial actor killed under a running Train run would leave
that group behind where the State API (Ray's dashboard) is missing, and the
next trial would wait for its CPUs forever. That is also why this is a class
trainable, not a function launching a ``TorchTrainer`` with
``TuneReportCallback``: a function hears of a stop only by being ended.

Ray is imported at the top: this module is loaded only when a trial has several workers.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray import tune
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from sweeps.runner.config import RunConfig
from sweeps.runner.ranks import Ranks
from sweeps.runner.train import BUDGET_PERCENT
from sweeps.search.ray_trial import TRAIN_DIR, train_reporting, trial_config

__all__ = ["WorkersTrial"]

POLL_SECONDS = 1.0  # how often a waiting step checks that the Train run is still alive


def _final(metrics: dict) -> bool:
    """Whether these are a run's last metrics: its budget is done, or it ended (diverged), or it was over."""
    return metrics["status"] != "running" or metrics[BUDGET_PERCENT] >= 100


class WorkersTrial(tune.Trainable):
    """One trial: a ``TorchTrainer`` of ``workers`` workers sharing ``cpus`` and ``gpus``; a ``step`` per evaluation."""

    def setup(self, params: dict, *, base: dict, space_file: str, metric: str, trials_dir: str, workers: int,
              cpus: float, gpus: float) -> None:  # fmt: skip
        config = trial_config(params, base, space_file, pathlib.Path(trials_dir) / self.trial_id)
        # Owned by this actor, they go with it; they take no CPU from the workers.
        self._results, self._replies = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
        per_worker = {"CPU": cpus / workers, **({"GPU": gpus / workers} if gpus else {})}
        self._trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "config": dataclasses.asdict(config), "metric": metric, "gpu": gpus > 0,
                "results": self._results, "replies": self._replies,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=gpus > 0, resources_per_worker=per_worker
            ),
            run_config=ray.train.RunConfig(
                name=self.trial_id, storage_path=str(pathlib.Path(trials_dir).parent / TRAIN_DIR)
            ),
        )  # fmt: skip
        self._error: BaseException | None = None
        self._awaiting_reply = False
        self._fit = threading.Thread(target=self._run, name="locoprop-train-run", daemon=True)
        self._fit.start()

    def _run(self) -> None:
        try:
            self._trainer.fit()
        except BaseException as err:  # raised in step, where Tune sees the trial fail
            self._error = err

    def step(self) -> dict:
        """The next evaluation's metrics (Tune asked for them: the workers go on)."""
        if self._awaiting_reply:
            self._replies.put(False)
            self._awaiting_reply = False
        metrics = self._next_metrics()
        if _final(metrics):
            return {**metrics, "done": True}
        self._awaiting_reply = True
        return metrics

    def _next_metrics(self) -> dict:
        while True:
            try:
                return self._results.get(timeout=POLL_SECONDS)
            except Empty:
                pass
            if not self._fit.is_alive():
                try:  # it may have reported just before it ended
                    return self._results.get_nowait()
                except Empty:
                    pass
                if self._error is not None:
                    raise self._error
                raise RuntimeError("the Ray Train run of this trial ended without reporting its last evaluation")

    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        """Nothing: the run directory holds the run's state, and a restarted trial resumes from it."""
        return {}

    def load_checkpoint(self, checkpoint: dict) -> None:
        """Nothing to load: ``setup`` resumes the run from its directory."""

    def cleanup(self) -> None:
        """Tune is done with the trial: workers waiting for an answer end the run as "stopped"; wait for them."""
        if self._awaiting_reply:
            self._replies.put(True)
            self._awaiting_reply = False
        self._fit.join()


def _train_worker(loop_config: dict) -> None:
    """One rank of a trial, in a Ray Train worker: train() in the process group Ray Train made.

    Rank 0 sends each evaluation's metrics to the trial and, unless they are
    the run's last, waits for its answer, which every rank then follows.
    """
    if loop_config["gpu"]:
        # Ray Train shows every worker all the GPUs of its node: without this each rank would use the first.
        torch.cuda.set_device(ray.train.torch.get_device())
    ranks = Ranks()
    results, replies = loop_config["results"], loop_config["replies"]

    def send(metrics: dict) -> bool:
        if ranks.writes:
            results.put(metrics)
        if _final(metrics):
            return False
        answer = [replies.get() if ranks.writes else None]
        dist.broadcast_object_list(answer, src=0)  # every rank must stop at the same step
        return answer[0]

    train_reporting(RunConfig.from_dict(loop_config["config"]), loop_config["metric"], send)
