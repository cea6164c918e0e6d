"""The `flowers` command line: `main` parses and dispatches to one module per subcommand
under `commands/`."""
