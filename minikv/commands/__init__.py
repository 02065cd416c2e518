"""One module per `minikv` command: add_arguments(parser) and main(args)."""
