"""Dataset formats (CIRR, FashionIQ, Shoes, and compir's synthetic benchmark in the CIRR layout)."""
