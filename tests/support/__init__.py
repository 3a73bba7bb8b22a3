"""What the tests share: the clips, the stand-in models, fakes of the engines and backends."""
