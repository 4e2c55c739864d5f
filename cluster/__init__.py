"""Ray: placement, rendezvous, the coordinator and scheduler, clients, batch jobs, the CLI."""
