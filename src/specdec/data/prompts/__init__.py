"""Prompt data: import, validated conversations, chat templates and loss masks, eval prompt sets."""
