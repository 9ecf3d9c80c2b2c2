"""The `lsmfm` command line: one entry point, one module per subcommand."""
