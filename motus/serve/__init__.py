"""`motus serve`: the policy server that follows a registry alias (`deployment`), its request contract
(`request`), the loaded version (`served`), its API (`app`) and metrics; and the MLflow pyfunc flavour of a
registered version (`pyfunc`)."""
