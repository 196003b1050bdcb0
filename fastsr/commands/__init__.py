"""One module per ``fastsr`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args)``."""
