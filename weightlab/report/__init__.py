"""Turning results into tables, JSON/CSV files and plots."""
