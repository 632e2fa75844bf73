"""``python -m relax_pl <fit|validate|test> --config ...`` (LightningCLI), ``python -m relax_pl evaluate ...``
(:mod:`relax_pl.evaluation`) and ``python -m relax_pl export ...`` (each command beside LightningCLI's is dispatched
here and listed in ``relax_pl.cli.OTHER_COMMANDS`` for --help)."""

import sys

from relax_pl.errors import reported_as_one_line

if __name__ == "__main__":
    with reported_as_one_line():  # a user error is one line; RELAX_PL_DEBUG=1 shows its traceback
        if sys.argv[1:2] == ["export"]:
            from relax_pl.export import main as export_main

            export_main(sys.argv[2:])
        elif sys.argv[1:2] == ["evaluate"]:
            from relax_pl.evaluation import main as evaluate_main

            evaluate_main(sys.argv[2:])
        else:
            from relax_pl.cli import main

            main()
