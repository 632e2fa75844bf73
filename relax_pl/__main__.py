from relax_pl.cli import main

if __name__ == "__main__":
    main()
