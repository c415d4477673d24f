"""Engine workers: the gateway's pool (placement, admission, supervision) and the workers it runs."""
