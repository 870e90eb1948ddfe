"""Privacy mechanisms and their accounting: DP-SGD at a site, client-level DP, SecAgg+ statistics."""
