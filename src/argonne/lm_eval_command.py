"""lm_eval's own command line with Argonne's model class registered:

    python -m argonne.lm_eval_command --model argonne --model_args pretrained=DIR --device cpu --tasks ...

takes every `lm_eval` option (`--device` as lm_eval's flag: it passes one, cuda:0 by default, to every model).
Released lm-eval finds a model class only in its own source tree or once imported; lm-eval versions with plugin
discovery find `argonne` through this package's `lm_eval.models` entry point, and plain `lm_eval` works there.
"""

import sys

from . import harness  # noqa: F401 - registers the "argonne" model with lm-eval


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
