"""The Chainlit side: the chat, its history and the quota line."""
