"""What the client and the server share: data, model, metrics, privacy ledger and config."""
