"""`popo sweep`: an Optuna study over config keys, its search spaces, storage and MLflow layout."""
