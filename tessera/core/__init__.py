"""The ground floor: the shard store, the stage runtime, Ray start, lineage and the funnel."""
