"""Studies: arms x training seeds at equal budgets, evaluated on shared units, compared by paired statistics."""
