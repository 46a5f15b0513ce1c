"""Supabase over its REST API: metering and Supabase Auth logins."""
