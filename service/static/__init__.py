"""Files the web app serves as they are: Swagger UI for /docs (swagger-ui/SOURCE)."""
