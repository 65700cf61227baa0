"""One recipe per published claim; see README.md for the list and what is missing."""
