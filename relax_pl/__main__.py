"""``python -m relax_pl <fit|validate|test> --config ...`` (LightningCLI), ``python -m relax_pl evaluate ...``
(:mod:`relax_pl.evaluation`) and ``python -m relax_pl export ...``."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        from relax_pl.export import main as export_main

        export_main(sys.argv[2:])
    elif sys.argv[1:2] == ["evaluate"]:
        from relax_pl.evaluation import main as evaluate_main

        evaluate_main(sys.argv[2:])
    else:
        from relax_pl.cli import main

        main()
