"""SecAgg / SecAgg+ pairwise-masking secure aggregation (Bonawitz et al. 2017; Bell et al. 2020)."""
