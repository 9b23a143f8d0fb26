"""Scores against labels: `scoring` (Dice, pixel error, V_rand, V_info over ranks; the ISBI export)
and `cross_validation` (folds of train -> predict -> evaluate)."""
