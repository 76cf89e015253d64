"""Fault injection for llmpareto (issue 15): the real CLI in subprocesses, SIGKILLed at random
moments, run out of disk, fed damaged files; then counted.

Importable by the pytest suite (tests/faults/test_faults.py) and by the benchmark
(`python3 -m llmpareto.bench.bench_faults`) as `llmpareto.tests.faults.harness`, which gathers
the public names of checks (judging run directories, counting trials, the table), kills (the
CLI SIGKILLed mid-search, pick, distill), damage (full disk, damaged inputs) and distributed
(RDB worker, Ray node); the servers are llmpareto.tests.clusters.

The checks here are independent of llmpareto: a run directory is judged with sqlite3, json,
pandas, gguf, safetensors and torch, never with llmpareto's own readers.
"""

from __future__ import annotations

from llmpareto.tests.faults.checks import (  # noqa: F401 - re-exported
    PNG_END,
    PNG_SIG,
    Outcome,
    account,
    check_file,
    check_run_dir,
    complete_trials,
    is_tmp,
    log,
    n_complete_fast,
    permission_problems,
    read_url,
    summarize,
    table,
    trial_records,
)
from llmpareto.tests.faults.damage import (  # noqa: F401 - re-exported
    BAD_RECIPES,
    DISK_BANDS,
    WRONG_UNITS,
    bad_recipe,
    damage_gguf,
    damage_study_db,
    disk_full,
    refuse,
    sha256,
    tmpfs_works,
    wrong_units,
    wrong_units_profile,
)
from llmpareto.tests.faults.distributed import (  # noqa: F401 - re-exported
    PgServer,
    RayCluster,
    SkipFault,
    kill_ray_node,
    kill_rdb_worker,
)
from llmpareto.tests.faults.kills import (  # noqa: F401 - re-exported
    ATTEMPTS,
    CLI,
    FAST,
    N_BASELINES,
    PHASES,
    clear_refusal,
    error_lines,
    export_complete,
    flags,
    front_trial,
    kill_at,
    kill_chain,
    kill_distill,
    kill_pick,
    missed,
    observed_phase,
    run_cli,
    search_argv,
    search_settings,
    sigkill,
    tiny_model,
)
