"""The HTTP boundary: the app factory, routes, middleware, REST job API and streams."""
