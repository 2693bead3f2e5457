# Runs doxygen on the configured Doxyfile and fails if it warned: an undocumented public name or a
# comment it cannot read (the warnings, one a line, in the output).
#   cmake -DDOXYGEN=... -DDOXYFILE=... -DWARNINGS=... -P reference.cmake
file(REMOVE "${WARNINGS}")
get_filename_component(_folder "${WARNINGS}" DIRECTORY)
file(MAKE_DIRECTORY "${_folder}")  # (doxygen does not make the warning log's folder)
execute_process(COMMAND "${DOXYGEN}" "${DOXYFILE}" RESULT_VARIABLE _result OUTPUT_QUIET ERROR_VARIABLE _errors)
if(_result)
  message(FATAL_ERROR "doxygen failed:\n${_errors}")
endif()
file(READ "${WARNINGS}" _warnings)
string(STRIP "${_warnings}" _warnings)
if(_warnings)
  string(REGEX MATCHALL "\n" _lines "${_warnings}\n")
  list(LENGTH _lines _count)
  message(FATAL_ERROR "the API reference has ${_count} warning lines (undocumented public names first):\n${_warnings}")
endif()
message(STATUS "the API reference documents every public name")
