"""One module per `kowalski-node` subcommand: `add_arguments(parser)` and `main(args) -> int`."""
