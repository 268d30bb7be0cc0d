"""stability: how far the output logits move per unit of KV-cache perturbation, with and without repair.

    python -m cachemedicpp.stability --config <YAML> --run_dir <DIR> [--resume|--no-resume]
                                     [--paired_run_dir <DIR>]

Definitions (all in fp32; the model is loaded in float32 whatever `dtype` says):
- Prompts: the LAST `num_prompts` consecutive windows of `prompt_len` tokens of the evaluation text's test
  split (`data.SPLITS`), so they do not coincide with the first windows the wikitext task scores. The clean state S is the KV cache of a
  clean prefill of prompt[:-1]; z(S) is the logit vector of the last prompt token processed with S.
- Perturbation at severity delta: a Gaussian direction on K and on V of every perturbed layer, inside the
  segment (KV heads or `head_subset`, time mask from `time_mode`/`N_recent`), rescaled per layer and per
  tensor so that ||Delta||_F = delta * delta_scale * rms(S_l) * sqrt(#masked entries), with rms(S_l) the
  RMS of that layer's whole K (or V). delta * delta_scale is thus a per-entry size relative to the layer.
- drift = ||z(S + Delta) - z_ref||_2 over the top-k logits of the clean, undefended z(S).
- Sensitivity(delta) = mean over prompts x directions of drift for: no defense; the best heuristic applied
  to the perturbed cache on the perturbed region (an oracle advantage); cachemedic (repair active in
  attention) against the clean undefended logits and against its own clean logits; and the operator of a
  paired run trained with train.lambda_contr = 0, when one is named.
- Amplification map gamma(l, h) = median over prompts x directions of drift / ||Delta_{l,h}||_F for a
  perturbation confined to layer l, KV head h and the segment, at delta = 1 (or the largest nonzero
  delta <= 1 measured). The repaired map measures drift against the repaired clean logits (the
  perturbation's own effect); the map against the undefended clean logits is stored beside it.

One unit of work is one prompt. Results are kept per unit in the run's stability progress file
(`RunDir.progress`), so a paused or killed run resumes where it stopped and produces bit-identical metrics:
every direction is drawn from `seeding.torch_rng(seed, "stability", ...)`, never from a shared stream.

Modules: `setup` (settings, checks, prompts), `perturb` (clean state, perturbation, drift), `sensitivity`,
`amplification`, `stage` (the unit of work, progress, `run`, `main`).
"""

from cachemedicpp.results import MAP_DEFENSES
from cachemedicpp.stability.perturb import direction
from cachemedicpp.stability.setup import (PHASE, Setup, best_heuristic, build_setup, check_paired_run, load_prompts,
                                          map_delta, measured_deltas, repair_checkpoint)
from cachemedicpp.stability.stage import aggregate, main, measure_prompt, run


__all__ = ["MAP_DEFENSES", "PHASE", "Setup", "aggregate", "best_heuristic", "build_setup", "check_paired_run",
           "direction", "load_prompts", "main", "map_delta", "measure_prompt", "measured_deltas",
           "repair_checkpoint", "run"]
