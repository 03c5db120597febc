"""Models: the ranker (EBC -> interaction arch -> task heads) and, later, RankTower."""
