"""PQF's P: the channel groups a model can reorder for free, and the search for the order that quantizes best."""
