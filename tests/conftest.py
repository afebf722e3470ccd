pytest_plugins = ["tests.cassandra_node"]
