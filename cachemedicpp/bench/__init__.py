"""bench: what the harness and the repair operator cost, measured side by side.

    python -m cachemedicpp.bench [--out bench/results.json] [--reps N] [--lengths 256,1024,2048] [--quick]
                                 [--config configs/quickstart.yaml] [--model NAME] [--device auto|cpu|cuda]

Measurements (each a key of the results JSON; every ratio is taken between runs interleaved in one
process, after a warm-up, and the median over repetitions is reported; wall-time ratios are the
measurements, CPU-time ratios are reported beside them):

- `train_step`: `train.Trainer.step` / a bare step of the same shapes with no harness (clean prefill of
  the prefix, teacher continuation forward, student continuation forward whose protected layers read
  `K * s` for one scalar parameter `s`, the same distillation loss, backward).
- `eval_grid`: the wall time of the eval grid (`eval.score_example` over every example of a small grid
  built from the base config) / the bare forwards that grid needs (one clean prefill per example and
  one continuation forward per cell); plus `eval.run` once, end to end, in a temporary run dir.
- `decode`: greedy decoding tokens/s at several cache lengths with the repair operator active (its U
  perturbed so it is not the identity) / tokens/s with the hook installed and no plan; the same for a
  naive operator that materialises the repaired K/V for every query (the reference's approach), and for
  `augmented`, the earlier factored form that appends r columns to q, K and V (exact too, but its cost
  grows with the cache length; the operator now folds the correction into q and the output instead).
- `memory`: peak memory of each workload. On CPU every workload runs in a fresh subprocess with glibc's
  mmap threshold pinned (so freed tensors leave the resident set), the kernel's peak-RSS mark is reset
  after setup and warm-up (`/proc/self/clear_refs`), and the peak is read from `VmHWM` after one unit of
  work; on CUDA it is `torch.cuda.max_memory_allocated` above the memory allocated before the unit.

Modules, in pipeline order: `settings` (the OpenMP wait policy, settings and their command line, the
workloads' run config, the machine record), `timing` (clock, interleaved and ABBA designs), `workloads`,
`measure` (the timed measurements), `memory_probe` (peak memory of the workloads), `stage` (run, summary,
table, main). The repair variants live in `cachemedicpp.repair_reference`.
"""

# settings first: it sets OMP_WAIT_POLICY, which only takes effect before torch is imported
from cachemedicpp.bench.settings import DECODE_VARIANTS, FORMAT, Settings, bench_config, parse_args, settings_from_args  # noqa: I001
from cachemedicpp.bench.stage import main, run, summary, table

__all__ = ["DECODE_VARIANTS", "FORMAT", "Settings", "bench_config", "main", "parse_args", "run", "settings_from_args",
           "summary", "table"]
