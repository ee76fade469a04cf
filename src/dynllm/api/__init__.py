"""HTTP routes: OpenAI-compatible forwarding, admin and status."""
