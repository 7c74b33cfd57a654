"""Notifications: events and their fan-out, signed deliveries, subscriptions, the SSRF policy."""
