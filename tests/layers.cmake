# The layers hold: each header of LAYER_HEADERS, preprocessed alone with the core's include paths
# only, reaches none of the FORBIDDEN headers (a regex over the dependency list the compiler
# prints). The core must reach neither the checkpoint layer, nlohmann-json, MPI nor libtorch; the
# checkpoint layer neither MPI nor libtorch. Lists come '|'-separated.
#   cmake -DCOMPILER=... -DINCLUDES=... -DHEADERS=... -DFORBIDDEN=<regex> -DWORK_DIR=... -P layers.cmake
foreach(_list INCLUDES HEADERS)
  string(REPLACE "|" ";" ${_list} "${${_list}}")
endforeach()
set(_args -std=c++17 -M)
foreach(_dir IN LISTS INCLUDES)
  list(APPEND _args "-I${_dir}")
endforeach()
file(MAKE_DIRECTORY "${WORK_DIR}")
foreach(_header IN LISTS HEADERS)
  file(WRITE "${WORK_DIR}/header.cpp" "#include <${_header}>\n")
  execute_process(COMMAND ${COMPILER} ${_args} "${WORK_DIR}/header.cpp" RESULT_VARIABLE _result
                  OUTPUT_VARIABLE _deps ERROR_VARIABLE _errors)
  if(_result)
    message(FATAL_ERROR "${_header} does not compile with the core's include paths alone:\n${_errors}")
  endif()
  string(REGEX MATCH "[^ \\\\\n]*(${FORBIDDEN})[^ \\\\\n]*" _found "${_deps}")
  if(_found)
    message(FATAL_ERROR "${_header} reaches ${_found}, a layer above its own")
  endif()
  message(STATUS "${_header}: stays in its layer")
endforeach()
