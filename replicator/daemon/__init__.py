"""replicatord: the long-running daemon (primary and replica roles, scheduler, admin API)."""
