"""Ray backend: a Ray Tune `Tuner` driven by `OptunaSearch` over the run's own Optuna study, on a
Ray cluster (`--address`) or a Ray started here; the run directory is a local run's, plus nodes.

The driver samples (define-by-run over the same Space and sampler as the local backend) and
tells Optuna; each Ray worker process loads the model and prepared-variant cache once
(`reuse_actors`) and only scores recipes. Trials whose worker dies are retried by Tune.
After the trials, recovery's points (`--recover-steps`) run as Ray tasks on the cluster, one
per point, and the driver writes each as it comes back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from typing import Any

from optuna.trial import TrialState

from llmpareto.errors import UserError
from llmpareto.front import Front
from llmpareto.placement import node_share
from llmpareto.recipe import Recipe
from llmpareto.rundir import RunDir
from llmpareto.search.records import record_trial
from llmpareto.search.runner import TrialRunner
from llmpareto.search.session import (
    NODE_COLUMNS,
    lifecycle,
    n_complete,
    open_run,
    prepare_run_dir,
    requeue_if_fixed,
    write_distributed_outputs,
)
from llmpareto.search.settings import SearchSettings

PAYLOAD = "llmpareto"  # result key carrying TrialResult.payload() and the node, as JSON
MAX_FAILURES = 3  # Tune restarts a trial whose worker died this many times
ROUNDS = 3  # Tuner runs while trials are missing (a trial that failed MAX_FAILURES times)
_RUNNERS: dict[str, TrialRunner] = {}  # per Ray worker process: one model, loaded once

TOKEN_HELP = (
    "Ray clusters started by Ray 2.60 require a token: on the head run `ray get-auth-token` "
    "and, wherever you run llmpareto (and on every `ray start --address` node), set "
    "RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (or copy "
    "it to ~/.ray/auth_token)"
)


def _worker_settings(settings: SearchSettings) -> dict:
    """What a worker needs to build the same TrialRunner (no paths of the driver's disk)."""
    d = settings.to_dict()
    for key in ("trials", "resume", "runs_dir", "progress", "storage", "address", "create_only"):
        d.pop(key)
    return d


def worker_placement(settings_dict: dict) -> dict:
    """A trial's torch device is the one Ray gave it: with --gpus-per-trial, its GPU (Ray sets
    CUDA_VISIBLE_DEVICES, so it is cuda); without, the CPU, even on a GPU node."""
    gpus = float(settings_dict.get("gpus_per_trial") or 0)
    return {**settings_dict, "torch_device": "cuda" if gpus > 0 else "cpu"}


def check_gpus(settings: SearchSettings, resources: dict) -> None:
    """Refuse GPU trials a cluster cannot place (Tune would wait for them forever)."""
    gpus, have = settings.gpus_per_trial, float(resources.get("GPU", 0))
    if settings.torch_device.startswith("cuda") and gpus == 0:
        raise UserError(f"--backend ray: trials go where Ray places them; instead of "
                        f"--torch-device {settings.torch_device}, ask for GPUs with "
                        "--gpus-per-trial 1 (or 0.5: two trials share a GPU)")
    if gpus > have:
        raise UserError(f"--gpus-per-trial {gpus:g}: the Ray cluster has {have:g} GPUs "
                        f"(ray.cluster_resources()); start nodes with GPUs (`ray start "
                        "--num-gpus N`), lower --gpus-per-trial, or use 0 for CPU trials")


def _this_node_share(settings_dict: dict) -> float:
    import ray

    node = ray.get_runtime_context().get_node_id()
    resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node), {})
    return node_share(resources, float(settings_dict["cpus_per_trial"]),
                      float(settings_dict.get("gpus_per_trial") or 0),
                      settings_dict.get("max_concurrent"))


def _worker_runner(settings_dict: dict) -> tuple[TrialRunner, float]:
    key = json.dumps(settings_dict, sort_keys=True)
    if key in _RUNNERS:
        return _RUNNERS[key], 0.0
    t0 = time.perf_counter()
    _RUNNERS.clear()  # a reused process serves one search at a time: free the old model
    runner = TrialRunner(SearchSettings.from_dict({**settings_dict, "progress": False}),
                         memory_share=_this_node_share(settings_dict))  # once a process
    runner.prepare()
    _RUNNERS[key] = runner
    return runner, time.perf_counter() - t0


def _trainable(config: dict, settings_dict: dict) -> None:
    """One Tune trial on a Ray worker: score the driver's recipe, report it."""
    import ray
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(settings_dict["cpus_per_trial"])))
    runner, load_s = _worker_runner(worker_placement(settings_dict))
    result = runner.run(Recipe.from_json(config["recipe"]))
    payload = result.payload()
    if load_s:
        payload["seconds"]["worker_load_s"] = load_s
    payload = {**payload, "node": ray.get_runtime_context().get_node_id(),
               "node_ip": ray.util.get_node_ip_address(), **runner.where()}
    objectives = settings_dict["objectives"]
    tune.report({**{o: result.metrics[o] for o in objectives}, PAYLOAD: json.dumps(payload)})


_MEASURES: dict[int, tuple] = {}  # per Ray worker process: recovery's base scores, once


def _recover_task(settings_dict: dict, recipe_json: str, trial: int, steps: int,
                  before: dict, rung: int = 0, start=None):
    """One point's recovery on a Ray worker (the runner its trials use, loaded once per
    process): the Outcome goes back to the driver, which writes it."""
    import ray
    import torch

    from llmpareto.search.recover import recover_point, recovery_measure

    torch.set_num_threads(max(1, int(settings_dict["cpus_per_trial"])))
    runner, _ = _worker_runner(worker_placement(settings_dict))
    if id(runner) not in _MEASURES:
        _MEASURES.clear()
        _MEASURES[id(runner)] = recovery_measure(runner)
    learn, measure = _MEASURES[id(runner)]
    out = recover_point(runner, Recipe.from_json(recipe_json), trial, steps, learn, measure,
                        runner.settings, before=before, rung=rung, start=start)
    out.columns.update(recover_node=ray.get_runtime_context().get_node_id(),
                       recover_pid=os.getpid())
    return out


def recovery_pool(settings: SearchSettings):
    """Recovery's rounds on the cluster: one Ray task per point, with a trial's resources,
    yielded to the driver as each finishes (a task whose worker dies is retried)."""
    import ray

    task = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial or 0,
                      max_retries=MAX_FAILURES)(_recover_task)
    settings_dict = _worker_settings(settings)

    def pool(jobs, here):  # `here` unused: every point runs on the cluster
        refs = {task.remote(settings_dict, j.recipe.to_json(indent=None), j.trial, j.steps,
                            j.before, j.rung, j.start): j.trial for j in jobs}
        left = list(refs)
        while left:
            done, left = ray.wait(left, num_returns=1)
            yield refs[done[0]], ray.get(done[0])
    return pool


class _Suggest:
    """Define-by-run space: the driver draws a recipe with the Space and saves it; the worker
    gets its JSON. Small and picklable (no model)."""

    def __init__(self, space: Any, rd: RunDir) -> None:
        self.space, self.rd = space, rd

    def __call__(self, trial: Any) -> dict:
        recipe = self.space.suggest(trial)
        recipe.save(self.rd.recipe_path(trial.number))
        return {"recipe": recipe.to_json(indent=None)}


# Driver-side searchers by key. Tune pickles its whole configuration when a Tuner is built
# (ray >= 2.5x writes tuner.pkl at once) and again on its checkpoints; the searcher holds the
# driver's sampler, study and storage (locks, connections, KL screens), which are neither
# picklable nor meaningful elsewhere. What Tune pickles is a handle: unpickled in this process it
# is the live searcher, anywhere else a placeholder that says how to resume.
_SEARCHERS: dict[str, Any] = {}


def _driver_searcher(key: str) -> Any:
    return _SEARCHERS.get(key) or _Detached(key)


class _Detached:
    """A searcher unpickled away from the driver that built it (Tuner.restore, another
    process): llmpareto's checkpoint is the Optuna study, so it refuses any use."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise UserError("this Ray Tune experiment's searcher lives in the llmpareto driver that "
                        "started it; continue the search with `llmpareto search --resume` (the "
                        "Optuna study is the checkpoint), not Tuner.restore")


def _searcher(**kwargs: Any):
    from ray.tune.search.optuna import OptunaSearch

    class Searcher(OptunaSearch):
        def __reduce__(self):
            return _driver_searcher, (self.llmpareto_key,)

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and result and PAYLOAD in result:
                payload = json.loads(result[PAYLOAD])
                record_trial(ot_trial, payload, {k: payload[k] for k in NODE_COLUMNS})
            super().on_trial_complete(trial_id, result, error)
            if ot_trial is not None and error:  # a baseline must still run once
                frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
                if frozen.state == TrialState.FAIL:
                    requeue_if_fixed(self._ot_study, frozen)

        def save_to_dir(self, *args: Any, **kwargs: Any) -> None:
            return None  # the Optuna study is the checkpoint; --resume reads it

    searcher = Searcher(**kwargs)
    searcher.llmpareto_key = f"{os.getpid()}-{id(searcher)}"
    _SEARCHERS[searcher.llmpareto_key] = searcher
    return searcher


def _connect(address: str | None) -> None:
    """Connect to the cluster (or start Ray here), failing fast with the address tried."""
    import ray
    from ray.exceptions import AuthenticationError

    if address and address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--address {address!r}: use auto or HOST:PORT (the GCS address "
                            "that `ray start --head` printed; port 6379 by default)")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise UserError(f"--address {address}: no Ray head answers there "
                            f"({exc.strerror or exc}); start one with `ray start --head "
                            f"--port {port}` or fix the address") from None
    try:
        ray.init(address=address, logging_level=logging.WARNING,
                 **({} if address else {"include_dashboard": False}))
    except AuthenticationError as exc:
        raise UserError(f"--address {address}: {str(exc).splitlines()[0]}. {TOKEN_HELP}") from None
    except RuntimeError as exc:  # ray.init's own check of the driver against the cluster
        if not str(exc).startswith("Version mismatch"):
            raise
        theirs, mine = (re.findall(r"Ray: (\S+)", str(exc)) + ["?", "?"])[:2]
        raise UserError(f"--address {address}: the Ray cluster runs ray {theirs}, this machine "
                        f"ray {mine}; every node and the driver need the same ray: `pip install "
                        f"'ray[tune]=={theirs}'` here, or restart the cluster with ray {mine}"
                        ) from None
    except ConnectionError as exc:
        # the port answered (checked above), so the head most likely refused this driver
        mine = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        hint = ("check that this token is the head's (`ray get-auth-token` there)" if mine
                else TOKEN_HELP)
        raise UserError(f"--address {address}: Ray refused or did not answer ({exc}). If the "
                        f"cluster uses token authentication: {hint}") from None


def node_versions() -> dict[str, str | None]:
    """What a node runs (called on each node by check_nodes)."""
    import ray

    from llmpareto.versions import package_versions

    return {"ray": ray.__version__, "llmpareto": package_versions(("llmpareto",))["llmpareto"],
            "node_ip": ray.util.get_node_ip_address()}


def check_nodes(timeout_s: float = 180) -> None:
    """Refuse a cluster whose nodes run another ray or llmpareto than this driver, before any
    trial is sent (a trial there would fail, or score with other code)."""
    import ray
    from ray.exceptions import RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from llmpareto.versions import package_versions

    mine = {"ray": ray.__version__, "llmpareto": package_versions(("llmpareto",))["llmpareto"]}
    probe = ray.remote(num_cpus=0, max_retries=0)(node_versions)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote() for n in nodes]
    for node, ref in zip(nodes, refs, strict=True):
        where = f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"
        try:
            theirs = ray.get(ref, timeout=timeout_s)
        except RayError as exc:
            first = (str(exc).strip().splitlines() or [repr(exc)])[-1][:200]
            raise UserError(f"--backend ray: {where} cannot run llmpareto ({first}); install "
                            f"llmpareto {mine['llmpareto']} and ray {mine['ray']} there") from None
        for pkg in ("ray", "llmpareto"):
            if theirs[pkg] != mine[pkg]:
                raise UserError(f"--backend ray: {where} runs {pkg} {theirs[pkg]}, this driver "
                                f"{pkg} {mine[pkg]}; install the same {pkg} on every node "
                                f"(`pip install {pkg}=={mine[pkg]}` there, or this node's "
                                "version here), then start the search again")


def _fit(settings: SearchSettings, runner: TrialRunner, rd: RunDir, sampler, n: int):
    from optuna.storages import RDBStorage
    from ray import tune

    searcher = _searcher(space=_Suggest(runner.space, rd), metric=settings.objectives,
                         mode=["min"] * len(settings.objectives), sampler=sampler,
                         study_name=settings.study, storage=RDBStorage(rd.storage_url))
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, settings_dict=_worker_settings(settings)),
        {"cpu": settings.cpus_per_trial,
         **({"gpu": settings.gpus_per_trial} if settings.gpus_per_trial else {})})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=n, reuse_actors=True,
                                    max_concurrent_trials=settings.max_concurrent,
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str((rd.path / "ray").resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)),
    )
    try:
        return tuner.fit()
    finally:
        _SEARCHERS.pop(searcher.llmpareto_key, None)


def run_ray(settings: SearchSettings) -> Front:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 silences only the old output
    if settings.storage:
        raise UserError("--backend ray keeps its study in the run directory; use --storage "
                        "with the local backend and `llmpareto worker`s instead")
    rd = prepare_run_dir(settings)
    _connect(settings.address)  # before the slow model load: a bad address fails in seconds
    import ray

    try:
        check_gpus(settings, ray.cluster_resources())
        check_nodes()
    except UserError:
        ray.shutdown()
        raise

    if settings.gpus_per_trial and settings.torch_dtype == "auto":
        settings.torch_dtype = "bfloat16"  # what `auto` means on the GPUs trials run on
    try:
        runner = TrialRunner(settings)
        study, info, recovered = open_run(settings, runner, rd)
        sampler = study.sampler
        info.update(backend="ray", cluster={"address": settings.address,
                                            "resources": ray.cluster_resources(),
                                            "nodes": len(ray.nodes())})
        errors: list[str] = []
        with lifecycle(rd, info, settings, study) as run:
            run.at_end(lambda info: info.update(recovered_trials=recovered,
                                                trial_errors=errors[:5]))
            for _ in range(ROUNDS):
                missing = settings.trials - n_complete(study)
                if missing <= 0:
                    break
                before = n_complete(study)
                grid = _fit(settings, runner, rd, sampler, missing)
                errors[:] = [(str(e).strip().splitlines() or [repr(e)])[-1][:300]
                             for e in grid.errors]
                if n_complete(study) == before:
                    run.status = "failed"
                    break
            if run.status != "failed":  # measured in the driver, recovered on the cluster
                from llmpareto.search.recover import after_search

                after_search(runner, study, rd, settings, settings.progress,
                             pool=recovery_pool(settings))
        status = run.status
        front = write_distributed_outputs(study, rd, settings.objectives, runner.space)
    finally:
        ray.shutdown()
    if status == "failed":
        raise UserError(f"every Ray trial failed (first error: {errors[0] if errors else '?'});"
                        " check that each node has llmpareto and the model installed")
    return front
