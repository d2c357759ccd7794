"""`tallyflow api`: the HTTP face of Tallyflow (events in over HTTP; usage queries next)."""
