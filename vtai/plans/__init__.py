"""Plans per tier: the caps and models of each tier, and the audit trail of every change."""
