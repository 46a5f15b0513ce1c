"""The database: connection, migrations, the embedded Postgres, accounts."""
