"""``python -m relax_pl <fit|validate|test> --config ...`` (LightningCLI) and ``python -m relax_pl export ...``
(each command beside LightningCLI's is dispatched here and listed in ``relax_pl.cli.OTHER_COMMANDS`` for --help)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        from relax_pl.export import main as export_main

        export_main(sys.argv[2:])
    else:
        from relax_pl.cli import main

        main()
