"""What runs at the coordinator: the Flower ServerApp, aggregation, ledger, report."""
