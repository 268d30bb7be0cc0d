"""lm-evaluation-harness tasks under KV-cache corruption: a `cachemedic` lm-eval model and a task adapter.

Two ways in, one scoring path (the eval grid's: `eval.grid.score_example` prefills the clean context,
corrupts the stored cache at rest on its old region, or on read, per `corruption.persistence`, applies the
defense, then scores the continuation rows with one forward over that cache):

- the lm-eval backend `cachemedic` (`python -m cachemedicpp.lmeval --model cachemedic --model_args
  config=Y,corruption=T,eps=E,defense=D[,run_dir=R] --tasks ...`): every request goes through ONE grid
  cell (T, E, D). The `lm_eval` executable itself cannot find it (lm-eval 0.4.x has no plugin discovery
  for models), so `python -m cachemedicpp.lmeval` registers it and then runs lm-eval's own CLI unchanged;
- an `eval.tasks` entry `lmeval:<task>`: the task's documents become `Example`s and join the whole
  grid (defenses × types × eps), the paired bootstrap, the AUC and the figures like a built-in task.

Layout: this module holds the names and the command, and needs no lm-eval; `tokens` encodes as lm-eval's
stock backend does, `adapter` turns lm-eval tasks into `eval.tasks` entries, `backend` is the lm-eval model.
These three import lm-eval (an optional dependency): they are imported only once it is known to be there.

Semantics, shared by both:

- Tokens are encoded exactly as lm-eval's stock `hf` model encodes them (context + continuation encoded
  whole, then split; trailing context spaces moved to the continuation; an empty context becomes the
  prefix token; left truncation to the model's length). The cache holds context[:-1]; each row feeds the
  context's last token + continuation[:-1], so every scored token reads the corrupted cache. With eps 0
  and no_defense the log-likelihoods equal the stock backend's within fp32 tolerance.
- The requests of one document that share a context (the choices of a multiple-choice question) are the
  rows of one `Example`: they are scored over one and the same corrupted cache. Its `example_id`
  ("lmeval:<task>:<doc_id>") seeds the corruption draws, so draws are per request (document), shared by
  all choices and by every defense (paired), and the same in both ways in.
- multiple_choice: x = lm-eval's own per-document metric (`process_results`) on the choices'
  (log-likelihood, is_greedy); `metric: acc` (argmax of the summed log-likelihood is gold) by default,
  `acc_norm` (length-normalised) on request. loglikelihood_rolling: the text is scored in windows that
  predict `eval.cont_len` tokens each from up to `eval.max_seq_len − eval.cont_len` cached context tokens
  (every window's context is corrupted); as an `eval.tasks` entry each window with a context is one example
  of a perplexity-kind task (the first token of a document has no context and is not scored there).
  generate_until: backend only, at-rest persistence, greedy decoding from the corrupted cache.
  Other output types are refused (exit 2).
"""

from __future__ import annotations

import sys
from typing import Sequence

from cachemedicpp.cli import EXIT_BAD_INPUT, EXIT_OK
from cachemedicpp.schema import ConfigError

MODEL_NAME = "cachemedic"
PREFIX = "lmeval:"  # eval.tasks names of lm-eval tasks: "lmeval:<task>"
INSTALL = 'pip install "cachemedicpp[lmeval]"'
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
CHOICE_TYPES = ("multiple_choice",)
ROLLING_TYPES = ("loglikelihood_rolling",)


def require():
    """The lm_eval package, or a ConfigError (exit 2) naming lm-eval and the install command."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.registry  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"lm-eval is not installed ({type(e).__name__}: {e}); install the optional "
                          f"dependency with {INSTALL}") from None
    return lm_eval


def is_lmeval(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def lmeval_name(name: str) -> str:
    """The lm-eval task name of an eval.tasks name ("lmeval:arc_easy" -> "arc_easy")."""
    return name[len(PREFIX):]


def register() -> type:
    """Register the `cachemedic` model with lm-eval and return its class (then `lm_eval.simple_evaluate(
    model="cachemedic", ...)` finds it); a ConfigError naming the install command without lm-eval."""
    require()
    from cachemedicpp.lmeval import backend  # imports lm-eval (optional): only once it is known to be there

    return backend.register()


# --------------------------------------------------------------------------------------------------
# the command: lm-eval's own CLI with the backend registered


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cachemedicpp.lmeval <lm_eval arguments>`: lm-eval's CLI with `--model cachemedic` available."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        require()
        from cachemedicpp.lmeval import backend  # imports lm-eval (optional): only once it is known to be there

        backend.evaluate(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return EXIT_OK
