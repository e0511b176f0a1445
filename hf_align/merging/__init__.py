"""Model averaging (AMA): linear, partwise and adaptive merges, streamed tensor by tensor."""
