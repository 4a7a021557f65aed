"""The federated engine: sampling, local training, client maps, aggregation, the round."""
